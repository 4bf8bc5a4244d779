from tcpgc.cli import main

raise SystemExit(main())
