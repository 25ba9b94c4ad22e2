//! The WAN simulator: a TCP relay that adds a one-way delay in each direction.
