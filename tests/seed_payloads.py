"""The seeds' payloads (../shared/seeds/workers-api.md), copied exactly: the in-process tests and the real-peer
test send these, so a shape drifting from the seed fails both."""

from __future__ import annotations

#: TrainingStatusPayload (POST /api/training-data).
TRAINING_STATUS = {"device_id": "unique-device-identifier", "timestamp": "2024-01-01T00:00:00Z",
                   "training_status": {"is_running": True, "current_epoch": 45, "total_epochs": 100, "accuracy": 0.85,
                                       "loss": 0.25, "samples_processed": 1000000},
                   "node_id": "node-identifier-if-available"}

#: DeviceInfoPayload (POST /api/node-info).
DEVICE_INFO = {"device_id": "unique-device-identifier", "timestamp": "2024-01-01T00:00:00Z",
               "device_info": {"gpu_type": "NVIDIA RTX 3080", "gpu_usage": 75.5, "gpu_memory_total": 10.0,
                               "gpu_memory_used": 6.5, "cpu_cores": 8, "total_memory_gb": 16.0, "battery_level": 85.0,
                               "is_charging": True},
               "metadata": {"platform": "windows", "app_version": "0.1.0", "node_id": None,
                            "capabilities": {"os": "windows", "arch": "x86_64", "family": "windows"}}}

#: NodeInfo payload (POST /api/node-info, the seeds' other shape).
NODE_INFO = {"device_id": "unique-device-identifier", "timestamp": "2024-01-01T00:00:00Z",
             "node_info": {"node_id": "node-unique-id", "endpoint": "ip:port",
                           "capabilities": {"max_memory_gb": 16.0, "gpu_type": "NVIDIA RTX 3080",
                                            "gpu_memory_gb": 10.0, "cpu_cores": 8, "network_bandwidth_mbps": 1000,
                                            "supported_models": ["bert-base", "gpt-2"]},
                           "current_load": 0.75, "latency": 50, "reliability": 0.95}}
