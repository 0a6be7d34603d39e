"""Students' session disks: the storage backends (local qcow2 overlays, Ceph RBD clones)
behind one interface, ``base.OverlayBackend``."""
