from burrow.compiled import check_fresh

check_fresh(__path__[0])
