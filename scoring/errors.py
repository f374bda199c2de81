class ScoreError(Exception):
    """The job cannot run as asked (bad arguments, inputs, labels or output path); the message says what to fix.
    `reskd score` reports it and exits 2. An unreadable image is not one of these: it becomes an error row."""
