"""
One module per fuzz target; see L{fuzz}.
"""
