"""The real-time sample pipeline: events and sources, the traffic generator, the sample join with its
state in the store, the feature DSL shared with serving, and the runners (embedded, Flink)."""
