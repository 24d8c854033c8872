"""The replication data path: extents, copier, writer, restore-point chains, verification.

Nothing here knows about the store or the UI: callers pass in a progress object, a cancel
event, a throttle and a journal, and persist what the data path reports.
"""
