/* The Linux guest's /init (in the guest's initramfs): counts on the
 * console, then writes its exit code to port 0xf4 (tandem's debug-exit
 * device), which ends `tandem run` with that status. */
#include <fcntl.h>
#include <stdio.h>
#include <sys/io.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <unistd.h>

#define EXIT_CODE 42

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
    printf("GUEST-INIT: hello from Linux userspace\n");
    for (int i = 1; i <= 5; i++)
        printf("GUEST-INIT: count %d\n", i);
    printf("GUEST-INIT: exiting with %d\n", EXIT_CODE);
    fflush(stdout);
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
