//! Every metric name in one place.
