//! The admin listener: /healthz, /pools (JSON), /map, /metrics (Prometheus).
