"""The punch-agent: registers with the rendezvous, punches tunnels, hands them to local programs."""
