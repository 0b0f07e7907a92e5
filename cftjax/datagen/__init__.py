"""Building training data with models: `cftjax data critique` (candidates, labels, CRL and CFT rows)."""
