"""Command line: ``pidbox bench`` (also ``python -m pidbox bench``)."""

from __future__ import annotations

import argparse
import sys

__all__ = ('main',)


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f'expected a positive integer, got {text}')
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog='pidbox', description="kombu's process mailbox, compiled.")
    commands = parser.add_subparsers(dest='command', metavar='COMMAND')
    commands.required = True
    bench = commands.add_parser(
        'bench', help='compare compiled, pure and kombu nodes on a broker',
        description='Start N nodes per implementation (compiled pidbox, pure '
                    'pidbox, kombu.pidbox), broadcast a realistic mix of '
                    'remote-control commands to them, then time sequential '
                    'calls; print throughput and call latency.')
    bench.add_argument('--broker', default='memory://',
                       help='broker URL (default: memory://)')
    bench.add_argument('--nodes', type=_positive, default=4,
                       help='nodes per implementation (default: 4)')
    bench.add_argument('--messages', type=_positive, default=5000,
                       help='messages broadcast for throughput (default: 5000)')
    bench.add_argument('--calls', type=_positive, default=200,
                       help='sequential calls timed for latency (default: 200)')
    bench.add_argument('--serializer', choices=('json', 'msgpack'),
                       default='json')
    bench.add_argument('--impl', action='append',
                       choices=('compiled', 'pure', 'kombu'),
                       help='implementation to run (repeatable; default: all)')
    bench.add_argument('--polling-interval', type=float, default=0.0005,
                       help='virtual transports: seconds between polls')
    bench.add_argument('--plot', metavar='FILE',
                       help="write a PNG chart (needs pidbox[plot])")
    bench.add_argument('--no-progress', action='store_true',
                       help='no progress output on stderr')
    return parser


def bench_command(args) -> int:
    from . import bench
    from ._core import IMPLEMENTATION

    impls = tuple(args.impl) if args.impl else bench.IMPLEMENTATIONS
    if 'compiled' in impls and IMPLEMENTATION != 'cython':
        print('pidbox bench: the compiled core is not loaded; '
              'skipping "compiled"', file=sys.stderr)
        impls = tuple(impl for impl in impls if impl != 'compiled')
    if args.plot:   # fail before the run, not after it
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            print("pidbox bench: --plot needs matplotlib; install it with "
                  "pip install 'pidbox[plot]'", file=sys.stderr)
            return 2
    results = bench.run_bench(
        url=args.broker, nodes=args.nodes, messages=args.messages,
        calls=args.calls, serializer=args.serializer, implementations=impls,
        polling_interval=args.polling_interval,
        progress=not args.no_progress)
    print(f'pidbox bench: {args.nodes} nodes on {args.broker}, '
          f'{args.messages} {args.serializer} messages (mix: 55% ping one '
          f'node, 20% glob, 15% pcre, 10% revoke of 1000 ids), '
          f'{args.calls} calls')
    print(bench.format_table(results))
    if args.plot:
        bench.plot(results, args.plot,
                   title=f'pidbox bench: {args.nodes} nodes, {args.broker}')
        print(f'chart written to {args.plot}')
    return 0


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == 'bench':
        return bench_command(args)
    return 2   # pragma: no cover - argparse requires a command


if __name__ == '__main__':   # pragma: no cover
    sys.exit(main())
