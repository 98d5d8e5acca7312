/usr/bin/time: cannot run ./weft-c1: No such file or directory
Command exited with non-zero status 127
0.00 1136
