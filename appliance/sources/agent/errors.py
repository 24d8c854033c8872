"""Errors of the linux-agent source: each names the server, what failed and the fix."""

from __future__ import annotations

from appliance.errors import FerrymanError


class AgentError(FerrymanError):
    code = "agent"


class AgentUnreachable(AgentError):
    """SSH could not connect or authenticate."""

    code = "agent_unreachable"


class AgentHostKeyChanged(AgentError):
    """The server presented another host key than the one pinned at first contact."""

    code = "agent_host_key_changed"


class AgentUnsupported(AgentError):
    """The server lacks something the agent needs (python3, root, lvm2, free extents)."""

    code = "agent_unsupported"


class AgentSnapshotError(AgentError):
    """Creating, reading or removing an LVM snapshot failed."""

    code = "agent_snapshot"


class AgentSnapshotFull(AgentSnapshotError):
    """The snapshot's copy-on-write space ran out: the snapshot is invalid, the origin is fine."""

    code = "agent_snapshot_full"
