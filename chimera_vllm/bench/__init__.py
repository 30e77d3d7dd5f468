"""Throughput, serving and step-profile benchmarks, their reports and plots, and the demo."""
