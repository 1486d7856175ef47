"""The streaming runtime: dense weights resident, routed experts read from their files on demand."""
