"""The parts of a cluster that are not a node: the public API's placement and routing
(`router`), the public sandbox proxy's routing (`proxy_routes`), and how the parts prove
themselves to each other (`secret`). A node agent is `vivarium serve --role node`: the
all-in-one server whose API answers the cluster alone."""
