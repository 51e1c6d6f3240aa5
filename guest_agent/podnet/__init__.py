"""The pod's network: its namespace and its path to the metadata service.

nsenter.py  enter or make a network namespace from a helper thread (no fork)
netns.py    the pod namespace (`netns ensure`) and the IMDS NAT (`netns imds-nat`: pyroute2, `nft -f`)

Not on the agent's boot path: `guest-agent run` only waits for a route (guest_agent/network.py),
and these run in units of their own.
"""
