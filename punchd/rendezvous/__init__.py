"""The public rendezvous server: STUN Binding for anyone, introductions for registered agents."""
