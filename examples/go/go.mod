module portflip.example/server

go 1.19
