"""`python -m bench`: measures ingest and workers against a bare aiohttp ceiling and a stock-arq
peer, all started here against one throwaway Redis, and reports the figures as same-run ratios."""
