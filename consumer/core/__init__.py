"""The pure core: the job contract, its names and headers, schedule, leases, the
delay ladder, rate-limit arithmetic, retry policy, outcomes and events, MIME building,
templates and the old systems' translations. No I/O driver is imported here.
"""
