"""A Flower federation a hospital's IT can run: ``fedoap provision`` turns a project file into
an operator kit and one kit per site (:mod:`~fedoap.deploy.kits`, keys and certificates from
:mod:`~fedoap.deploy.pki`), and ``fedoap deploy`` runs the study from the operator kit
(:mod:`~fedoap.deploy.operate`)."""
