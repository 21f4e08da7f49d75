"""The inference engine: requests, scheduling, paged KV cache, the model runner and the step loop."""
