"""The protocol and its transports: :mod:`~fedoap.federation.server` and
:mod:`~fedoap.federation.site` (the protocol, written once), :mod:`~fedoap.federation.runner`
(in-process) and :mod:`~fedoap.federation.flower_transport` (Flower). Nothing is imported here:
Flower's per-message ClientApp (:mod:`~fedoap.federation.flower_client`) must not pay for
PyTorch."""
