"""Source adapters: where machines' disks are read from (libvirt/KVM, NBD, vSphere, agent)."""
