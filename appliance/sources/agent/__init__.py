"""Linux agent source: servers reached over SSH, LVM snapshots, server-side block hashes
(docs/agent.md).

- :class:`~appliance.sources.agent.source.LinuxAgentSource`: the adapter (kind "linux-agent").
- :func:`~appliance.sources.agent.ssh.scan_host_key`: the host key to confirm at first contact.
- ``helper.py`` is not imported here: it is the file copied to and run on the server.
"""
