"""What puts events into Kafka: the app SDK, the JSONL publisher, the simulator, the replayer."""
