//! Server side of the simulated phone network.
