"""V2V conversion: inspect -> preflight -> convert -> customise -> verify (-> boot as proof).

Everything works on a throw-away qcow2 overlay over a restore point; the chain is never written.
See appliance/convert/README.md for the choices (initramfs strategy, backends, limits).
"""
