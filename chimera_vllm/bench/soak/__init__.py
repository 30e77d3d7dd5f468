"""The soak: the OpenAI-compatible server under long mixed traffic with faults, with and without a draft."""
