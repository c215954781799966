"""What the fleet looks like right now, as the autoscaler and the dashboard both read it:
queue observations from Redis (one pipelined round trip), smoothed rates, operator
overrides, and the worker report schema the heartbeat writes.

It lives in ``fleet`` and not in ``autoscale`` so the dependency runs one way:
``autoscale`` (decide and act: policy, backends, loop) imports this; nothing in
``fleet`` imports ``autoscale`` but the composition roots (the CLI and ``fleet up``).
"""
