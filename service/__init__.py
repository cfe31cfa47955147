"""kleinserve's server: everything that runs inside ``twistd -n inference``."""
