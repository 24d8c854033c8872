"""The ssh options of a qemu+ssh:// libvirt source: the same ones libvirt uses for the URI."""

from __future__ import annotations

import pytest

from appliance.sources.libvirt_remote import LibvirtRemoteError, RemoteHost, is_remote


def test_ssh_options_follow_the_libvirt_uri() -> None:
    h = RemoteHost("qemu+ssh://admin@kvm2:2222/system?keyfile=/k/id&no_verify=1&command=/x/ssh")
    argv = h.argv("-N")
    assert argv[0] == "/x/ssh" and argv[-1] == "kvm2" and argv[-2] == "-N"
    assert argv[argv.index("-p") + 1] == "2222" and argv[argv.index("-l") + 1] == "admin"
    assert argv[argv.index("-i") + 1] == "/k/id" and "StrictHostKeyChecking=no" in argv
    plain = RemoteHost("qemu+ssh://kvm3/system").argv()
    assert plain[0] == "ssh" and "-p" not in plain and "StrictHostKeyChecking=no" not in plain


def test_local_and_non_ssh_uris() -> None:
    assert not is_remote("qemu:///system") and is_remote("qemu+ssh://root@h/system")
    with pytest.raises(LibvirtRemoteError, match="only qemu\\+ssh:// can reach it"):
        RemoteHost("qemu+tcp://kvm4/system")
