//! A simulated phone: dials a number or waits at one, streams PCM and hears the call.
