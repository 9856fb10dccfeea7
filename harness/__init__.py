"""kvbench harness: declarative suites over the engine (see DESIGN.md)."""
