//! Lab machinery (being written).
