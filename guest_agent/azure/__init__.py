"""Azure's fabric: the reports that replace waagent / CAA's azure-ready (user-data from IMDS is
clouds/azure.py, beside the other clouds).

wire.py    pure: goal-state parse, health XML/JSON builders, DHCP option 245
health.py  the wireserver client: one report loop over the JSON and XML endpoints
kvp.py     Hyper-V KVP records and the encoded PROVISIONING_REPORT
fabric.py  KVP first, then the report; never Ready after NotReady in a boot
"""
