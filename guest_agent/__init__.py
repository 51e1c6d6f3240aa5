"""guest-agent: early-boot provisioning agent for confidential peer-pod VMs."""

__version__ = "0.1.0"
