/* The Linux guest's /init (in the guest's initramfs): counts on the
 * console, then writes its exit code to port 0xf4 (tandem's debug-exit
 * device), which ends `tandem run` with that status. The kernel command
 * line's `l2.count=N` (default 5) and `l2.sleep_ms=M` (default 0) set how
 * far it counts and how long it sleeps between counts (the pair scenario
 * fails over while it counts). */
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/io.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <termios.h>
#include <unistd.h>

#define EXIT_CODE 42

/* The value of `key` (e.g. "l2.count=") on the kernel command line. */
static long cmdline_value(const char *cmdline, const char *key, long fallback) {
    const char *at = strstr(cmdline, key);
    return at ? strtol(at + strlen(key), NULL, 10) : fallback;
}

int main(void) {
    mkdir("/dev", 0755);
    mknod("/dev/console", S_IFCHR | 0600, makedev(5, 1));
    int fd = open("/dev/console", O_RDWR);
    if (fd >= 0) {
        dup2(fd, 0);
        dup2(fd, 1);
        dup2(fd, 2);
    }
    mkdir("/proc", 0755);
    mount("proc", "/proc", "proc", 0, NULL);
    char cmdline[4096] = "";
    int cfd = open("/proc/cmdline", O_RDONLY);
    if (cfd >= 0) {
        ssize_t n = read(cfd, cmdline, sizeof cmdline - 1);
        cmdline[n > 0 ? n : 0] = 0;
        close(cfd);
    }
    long count = cmdline_value(cmdline, "l2.count=", 5);
    long sleep_ms = cmdline_value(cmdline, "l2.sleep_ms=", 0);
    printf("GUEST-INIT: hello from Linux userspace\n");
    for (long i = 1; i <= count; i++) {
        printf("GUEST-INIT: count %ld\n", i);
        fflush(stdout);
        if (sleep_ms > 0)
            usleep((useconds_t)sleep_ms * 1000);
    }
    printf("GUEST-INIT: exiting with %d\n", EXIT_CODE);
    fflush(stdout);
    /* fflush only hands the line to the kernel's tty buffer, which the
     * serial driver drains on transmit interrupts: without waiting, the
     * exit write below can end the VM before the line is out (seen on a
     * pair's live secondary). */
    tcdrain(STDOUT_FILENO);
    sync();
    if (ioperm(0xf4, 1, 1) != 0) {
        perror("GUEST-INIT: ioperm");
        for (;;)
            pause();
    }
    outb(EXIT_CODE, 0xf4);
    printf("GUEST-INIT: still running after the exit write\n");
    for (;;)
        pause();
}
