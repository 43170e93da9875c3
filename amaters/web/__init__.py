"""The ops site: health probes, metrics and (later) the admin API, served by Klein."""
