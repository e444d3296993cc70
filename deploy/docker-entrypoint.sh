#!/bin/sh
# Entry point of the Terrazzo service image (Dockerfile, target `server`).
#
#   serve [ARGS]  (the default) serve $TERRAZZO_CATALOG; when it is unset, build the demo
#                 catalog into $TERRAZZO_DEMO_DIR (default /data/demo) first, then serve it
#   catalog       only make sure the catalog is there, then exit (docker-compose.yml runs this
#                 once, before the replicas start, so they all share one catalog)
#   anything else runs as given, e.g. `terrazzo index /catalog/items.ndjson -o /data/items.parquet`
#
# A TERRAZZO_CATALOG that is set but is not a file in the container is an error (a missing
# mount), never silently replaced by the demo.
set -eu

demo_dir="${TERRAZZO_DEMO_DIR:-/data/demo}"

prepare_catalog() {
    catalog="${TERRAZZO_CATALOG:-}"
    if [ -z "$catalog" ] || [ "$catalog" = "$demo_dir/items.parquet" ]; then
        # `terrazzo demo` leaves an existing demo catalog as it is.
        terrazzo demo --output "$demo_dir" --size "${TERRAZZO_DEMO_SIZE:-1024}"
        TERRAZZO_CATALOG="$demo_dir/items.parquet"
        export TERRAZZO_CATALOG
    elif [ ! -f "$catalog" ]; then
        echo "terrazzo: TERRAZZO_CATALOG=$catalog is not a file in this container;" \
            "mount the directory that holds it (see docker-compose.yml)" >&2
        exit 2
    fi
}

command="${1:-serve}"
[ "$#" -gt 0 ] && shift
case "$command" in
    serve)
        prepare_catalog
        exec terrazzo serve "$@"
        ;;
    catalog)
        prepare_catalog
        echo "terrazzo: catalog ready at $TERRAZZO_CATALOG"
        ;;
    *)
        exec "$command" "$@"
        ;;
esac
