"""The lab: cloudbench's test bed on one machine (``cloudbench lab up|down|status|env``).

- ``hosts``: N hosts as network namespaces on a bridge, each with its own sshd (the ssh provider's inventory);
- ``slurm``: a real Slurm cluster (slurmctld + slurmd) for the slurm provider;
- ``emulators``: OpenStack, AWS (moto), Exoscale and Kubernetes (kmock) APIs whose servers are lab hosts;
- ``openstack``: a real OpenStack control plane (Keystone, Nova, Neutron, Glance, Placement) whose servers are lab
  hosts (``--openstack real``);
- ``common``: what they share (state directory, ssh to a host, the lab's cloud name).

Nothing in the product (harness.*, providers.*, gan.*) imports this package: a lab reaches the providers only
through the standard variables that ``cloudbench lab env`` prints (OS_CLIENT_CONFIG_FILE, AWS_PROFILE, KUBECONFIG...).
"""
