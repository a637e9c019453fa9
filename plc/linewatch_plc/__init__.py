"""linewatch's PLC side: the reject message format (`wire`), a follower that recovers every missed verdict and
fails safe on silence (`follower`), and the gateways that hand verdicts to a PLC (`opcua`, `modbus`). It needs
neither numpy nor torch, so it installs alone on a box next to the PLC (`pip install ./plc[opcua,modbus]`)."""
