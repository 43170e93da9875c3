"""Operations: reload, logging, retry, snapshots' plumbing and other operator-facing machinery."""
