//! The command-line tool (being written).
