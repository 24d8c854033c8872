# Admin shells: the appliance's own tools first.
export LANG=${LANG:-C.UTF-8}
export LIBGUESTFS_BACKEND=${LIBGUESTFS_BACKEND:-direct}
