"""How the server's steps reach the sites: the interface every transport implements.

The in-process runner (:class:`~fedoap.federation.runner.InProcess`) calls each site's
:meth:`~fedoap.federation.site.Site.handle` directly; the Flower ServerApp
(:class:`~fedoap.federation.flower_transport.FlowerTransport`) sends one message per site per
step. The server (:mod:`fedoap.federation.server`) sees only this interface, so a new transport
is one class and the protocol does not change.
"""

from __future__ import annotations

from typing import Any, Protocol

from fedoap.basetypes import StateDict
from fedoap.federation.site import Reply, Step
from fedoap.federation.state import RunState, SiteState


class Transport(Protocol):
    """How steps reach the sites."""

    #: "inprocess" or "flower": recorded in the checkpoint, which only that transport resumes.
    runtime: str
    #: What the run's plot titles add after the method's name ("" or " on Flower").
    label: str
    #: Uploads come from this process's own code: a malformed one is a bug, not a bad site.
    trusted: bool
    #: The server's checkpoint holds every site's state (in-process), so it may save every
    #: ``federation.checkpoint_every`` steps; otherwise the sites keep their own states, only
    #: their last few steps' worth, and the server saves every step.
    holds_site_states: bool

    def exchange(
        self, steps: dict[str, Step], global_arrays: StateDict, ft_extra: StateDict
    ) -> tuple[dict[str, Reply], dict[str, str]]:
        """Send each named site its step; returns the replies and the lost sites (name ->
        why) of those that did not reply."""
        ...

    def site_states(self) -> dict[str, SiteState]:
        """The site states the server holds (in-process: every one; on Flower: none, sites
        keep their own)."""
        ...

    def restore_sites(self, rs: RunState) -> None:
        """Put the checkpoint's site states back (in-process) or nothing (Flower)."""
        ...

    def history(self) -> dict[str, Any]:
        """Transport-specific history kept in the checkpoint (e.g. Flower's byte counts)."""
        ...

    def restore_history(self, history: dict[str, Any]) -> None: ...

    def describe(self) -> dict[str, Any]:
        """Extra ``summary.json`` fields (``execution``, transport timings)."""
        ...
