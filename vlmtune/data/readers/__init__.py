"""One module per row layout (`data.format`), each with `REQUIRED` and `OPTIONAL` field names and
`read(row, resolve, options) -> Conversation` raising `RowError`; `sources` yields the raw rows."""
