"""The HTTP side: verifies Facebook's signature, queues every event, acknowledges at once."""
