"""Runtime: the composition roots (daemon, replica) and the process they run in."""
