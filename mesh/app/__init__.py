"""The composition root of a peer and what runs beside it: the CLI, the HTTP API, the demo, the local-mesh
harnesses. Nothing below ``mesh.app`` imports it."""
