"""The cluster harness and chaos runner (issue 15): real nodes on this machine, faults
under load."""
